"""`splitfuse chat`: a real process driven through a pipe and through a pseudo-terminal; every answer is the
text LLM.chat gives (greedy, fp32) for the conversation the chat should have rendered."""

from __future__ import annotations

import fcntl
import io
import os
import select
import shutil
import subprocess
import sys
import termios
import time

import pytest

from splitfuse.entrypoints.chat import COMMANDS_HELP, PROMPT, STOPPED_NOTE, ChatSession
from splitfuse.entrypoints.cli import build_parser
from splitfuse.entrypoints.llm import LLM
from splitfuse.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(300)

ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "TERM": "dumb"}
GREEDY_FLAGS = ["--dtype", "float32", "--temperature", "0"]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def llm(llama_ckpt) -> LLM:
    return LLM(model=llama_ckpt, dtype="float32")


def chat_text(llm: LLM, messages: list[dict[str, str]], params: SamplingParams) -> str:
    return llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text


def chat_process(model: str, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "splitfuse", "chat", "--model", model, *GREEDY_FLAGS, *flags]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, encoding="utf-8", env=ENV,
                          timeout=240)


def test_over_stdin_the_history_is_kept_reset_clears_it_and_exit_quits(llama_ckpt, llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    first = chat_text(llm, [user("Hello there")], params)
    second = chat_text(llm, [user("Hello there"), assistant(first), user("Tell me more")], params)
    assert second != chat_text(llm, [user("Tell me more")], params)  # the history changes the answer

    result = chat_process(llama_ckpt, "Hello there\nTell me more\n/reset\nHello there\n/nope\n/exit\nnever asked\n",
                      "--max-tokens", "12")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (f"{PROMPT}{first}\n{PROMPT}{second}\n{PROMPT}(conversation cleared)\n{PROMPT}{first}\n"
                             f"{PROMPT}unknown command /nope: {COMMANDS_HELP}\n{PROMPT}")


def test_end_of_input_quits(llama_ckpt, llm):
    first = chat_text(llm, [user("Hello there")], SamplingParams(temperature=0, max_tokens=5))
    result = chat_process(llama_ckpt, "Hello there\n", "--max-tokens", "5")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{PROMPT}{first}\n{PROMPT}\n", "")


class Terminal:
    """A process on a pseudo-terminal: Ctrl-C typed there is a SIGINT from the terminal, as for a user."""

    def __init__(self, command: list[str]) -> None:
        self.master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST  # the program's bytes as written ("\n" not turned into "\r\n")
        # ^C must not flush the output queue: text the program wrote before it stopped would be lost to the
        # test's reading (a user's terminal may drop it; the test checks what the program wrote).
        attrs[3] |= termios.NOFLSH
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        # A session of its own with the terminal as its controlling terminal, so ^C signals it.
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=ENV,
                                        start_new_session=True,
                                        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.output = b""

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def read_until(self, done, timeout_s: float = 120) -> str:
        """Reads until ``done(text so far)``; the text so far."""
        deadline = time.monotonic() + timeout_s
        while not done(self.text):
            assert time.monotonic() < deadline, f"timed out; the terminal shows {self.text!r}"
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    chunk = os.read(self.master, 1 << 16)
                except OSError:  # EIO: the process closed the terminal
                    chunk = b""
                assert chunk or done(self.text), f"the terminal closed; it shows {self.text!r}"
                self.output += chunk
        return self.text

    def read_past(self, marker: str, since: int = 0) -> int:
        """Reads until ``marker`` shows after position ``since``; the position just past it (the echo of typed
        keys and the first bytes of the answer may come in one read)."""
        text = self.read_until(lambda t: marker in t[since:])
        return text.index(marker, since) + len(marker)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        os.close(self.master)


def test_ctrl_c_stops_an_answer_drops_the_exchange_and_at_the_prompt_quits(llama_ckpt, llm):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    long_first = chat_text(llm, [user("Hello there")], params)
    # The stopped exchange leaves no trace: the next answer is a first answer.
    fresh = chat_text(llm, [user("Tell me more")], params)
    terminal = Terminal([sys.executable, "-m", "splitfuse", "chat", "--model", llama_ckpt, *GREEDY_FLAGS,
                         "--max-tokens", "200", "--ignore-eos"])
    try:
        assert terminal.read_until(lambda t: t.endswith(PROMPT)) == f"{COMMANDS_HELP}\n{PROMPT}"
        terminal.type("Hello there\n")
        start = terminal.read_past("Hello there\n")
        terminal.read_until(lambda t: len(t) > start)  # the answer has begun
        terminal.type("\x03")
        shown = terminal.read_until(lambda t: t.endswith(f"\n{STOPPED_NOTE}\n{PROMPT}"))
        # The terminal echoes ^C where the key came; a step or so of text may follow it.
        partial = shown[start:-len(f"\n{STOPPED_NOTE}\n{PROMPT}")].replace("^C", "", 1)
        assert long_first.startswith(partial) and len(partial) < len(long_first)

        terminal.type("Tell me more\n")
        start = terminal.read_past("Tell me more\n", since=len(shown))
        shown = terminal.read_until(lambda t: t[start:].endswith(f"\n{PROMPT}"))
        assert shown[start:] == f"{fresh}\n{PROMPT}"

        # A key that lands between the prompt's write and the read under it waits for the next key
        # (input() checks signals only when its read is interrupted); a person is never that fast.
        time.sleep(0.3)
        terminal.type("\x03")
        assert terminal.process.wait(timeout=60) == 0
    finally:
        terminal.close()


def test_a_stopped_answer_frees_its_kv_blocks_and_leaves_the_history_as_it_was(llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = io.StringIO()
    session = ChatSession(llm, params, out)
    first = session.ask("Hello there")
    assert out.getvalue() == first + "\n"
    assert session.messages == [user("Hello there"), assistant(first)]

    out.seek(0)
    out.truncate()
    session.stop_requested = lambda: out.tell() > 0  # stop as soon as the answer has begun
    assert session.ask("Tell me more") is None
    partial = out.getvalue().removesuffix(f"\n{STOPPED_NOTE}\n")
    full = chat_text(llm, [user("Hello there"), assistant(first), user("Tell me more")], params)
    assert full.startswith(partial) and 0 < len(partial) < len(full)
    assert session.messages == [user("Hello there"), assistant(first)]
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.engine_core.scheduler.kv_cache.num_free_blocks == llm.engine.engine_core.scheduler.kv_cache.num_blocks

    too_long = [*session.messages, user("word " * 300)]
    num_tokens = len(llm.apply_chat_template(too_long))
    with pytest.raises(ValueError) as error:
        session.ask("word " * 300)
    assert str(error.value) == f"prompt has {num_tokens} tokens, but the model's context length (max_model_len) is 512"
    assert session.messages == [user("Hello there"), assistant(first)]


def test_one_question_on_the_default_model(smollm2_default_dir):
    # No --model: the default model (SmolLM2-135M-Instruct), converted once by the fixture.
    result = subprocess.run([sys.executable, "-m", "splitfuse", "chat", "What is the capital of France?",
                             "--temperature", "0", "--max-tokens", "32"],
                            capture_output=True, text=True, encoding="utf-8", env=ENV, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and result.stdout.endswith("\n") and PROMPT not in result.stdout


def test_a_model_without_a_chat_template_chat_refuses_and_generate_completes_the_text(llama_ckpt, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(llama_ckpt, plain)
    (plain / "chat_template.jinja").unlink()
    args = build_parser().parse_args(["chat", "--model", str(plain), "--dtype", "float32"])
    assert args.func(args) == 1
    assert capsys.readouterr().err == (f"splitfuse chat: the model {str(plain)!r} has no chat template "
                                       f"(`splitfuse generate --raw` completes plain text)\n")

    completion = LLM(model=str(plain), dtype="float32").generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text
    args = build_parser().parse_args(["generate", "Once upon a time", "--model", str(plain), *GREEDY_FLAGS,
                                      "--max-tokens", "6"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == completion + "\n"


@pytest.mark.parametrize("flags, exit_code, message", [
    (["--model", "/nonexistent/model"], 1,
     "splitfuse chat: cannot load the model: model '/nonexistent/model' is neither a checkpoint directory, "
     "a .gguf file, nor a built-in name (smollm2-135m-instruct, demo-random)\n"),
    (["--dtype", "int3"], 2,
     "splitfuse chat: error: dtype must be one of ('bfloat16', 'float16', 'float32', 'auto'), got 'int3'\n"),
    (["--temperature", "-1"], 2, "splitfuse chat: error: temperature must be in [0, 100], got -1.0\n"),
], ids=["no-such-model", "bad-engine-flag", "bad-sampling-flag"])
def test_errors_are_one_line_with_the_exit_status(flags, exit_code, message, capsys):
    args = build_parser().parse_args(["chat", *flags])
    assert args.func(args) == exit_code
    assert capsys.readouterr().err == message
