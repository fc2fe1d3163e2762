"""The CPU platform: the C kernels (built at run time), their paged attention, packed linears and fused decoder."""
