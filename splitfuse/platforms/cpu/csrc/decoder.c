/* All decoder layers of a Llama-family step in one call, for bf16 models on AMX CPUs.
 *
 * The Python forward (models/llama.py) calls the same C functions one by one: about ten calls a
 * layer, each with its checks, tensor allocations and ctypes marshalling, a good part of a decode
 * step in all (docs/benchmarks.md). Here they run back to back with the same arguments in the same order, so the
 * results are identical bit for bit (tests/e2e/test_offline.py compares the two). Steps whose
 * attention needs SDPA (long prompt chunks) and models with q/k norms or MoE keep the Python path.
 */

#include <stdint.h>
#include <string.h>

/* The kernels' prototypes and the decoder_layer / decoder_step structs, generated from
 * platforms/cpu/c_interface.py (as are the ctypes bindings platforms/cpu/decoder.py fills them with).
 * The gated MLP's first half is amx_linear_silu_mul, as AmxLinear(silu_mul=True) runs it in Python. */
#include "splitfuse_kernels.h"

size_t decoder_layer_size(void) { return sizeof(decoder_layer); }
size_t decoder_step_size(void) { return sizeof(decoder_step); }

/* hidden [tokens, hidden]: the embeddings in, the last layer's MLP output out; residual [tokens,
 * hidden]: the residual stream before it out (the final norm adds the two, as the Python path does). */
void decoder_layers(const decoder_layer *layers, int num_layers, const decoder_step *s, uint16_t *hidden,
                    uint16_t *residual) {
    const int64_t t = s->tokens, h = s->hidden, q_size = s->num_heads * s->head_dim;
    const int64_t kv_size = s->num_kv_heads * s->head_dim, qkv_size = q_size + 2 * kv_size;
    uint16_t *query = s->qkv, *key = s->qkv + q_size, *value = s->qkv + q_size + kv_size;
    for (int i = 0; i < num_layers; i++) {
        const decoder_layer *l = &layers[i];
        if (i == 0) {
            rms_norm(0, s->normed, NULL, hidden, l->input_norm, t, (int)h, h, s->eps);
            memcpy(residual, hidden, (size_t)(t * h) * sizeof *hidden);
        } else {
            rms_norm(0, s->normed, residual, hidden, l->input_norm, t, (int)h, h, s->eps);
        }
        amx_linear(s->qkv, qkv_size, s->normed, h, l->qkv, l->qkv_bias, t, qkv_size, h);
        rotary_embedding(0, query, key, s->positions, s->cos, s->sin, t, (int)s->num_heads, (int)s->num_kv_heads,
                         (int)s->head_dim, qkv_size, qkv_size);
        write_kv_cache(0, l->key_cache, l->value_cache, key, value, s->slot_mapping, t, (int)kv_size, qkv_size,
                       qkv_size);
        paged_attention(0, s->attention, query, l->key_cache, l->value_cache, s->block_tables, s->block_table_stride,
                        s->query_start_loc, s->context_lens, s->requests, (int)s->num_requests, (int)s->num_heads,
                        (int)s->num_kv_heads, (int)s->head_dim, (int)s->block_size, s->scale, (int)l->window,
                        qkv_size);
        amx_linear(hidden, h, s->attention, q_size, l->o, l->o_bias, t, h, q_size);
        rms_norm(0, s->normed, residual, hidden, l->post_norm, t, (int)h, h, s->eps);
        amx_linear_silu_mul(s->activation, s->intermediate, s->normed, h, l->gate_up, l->gate_up_bias, t,
                            2 * s->intermediate, h);
        amx_linear(hidden, h, s->activation, s->intermediate, l->down, l->down_bias, t, h, s->intermediate);
    }
}
