"""The `splitfuse chat` subcommand: a terminal chat with a model (like `ollama run`), each answer streamed.

    splitfuse chat                      # >>> prompt; the conversation is kept; /reset, /exit, Ctrl-D
    splitfuse chat "What is 2 + 2?"     # one answer, then exit

Each question renders the whole conversation (user and assistant turns) with the model's chat template
and runs it as one request on the offline engine, stepped here so that every step's new text is printed
at once. Ctrl-C while an answer streams stops it: the request is aborted in the engine (its KV blocks
are freed) and the unfinished exchange, question and partial answer, is dropped from the history, so the
next question follows the last complete answer. Ctrl-C or Ctrl-D at the prompt quits.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, TextIO

from splitfuse.entrypoints.openai.cli_args import (CommandError, add_engine_flags, add_sampling_flags,
                                                   load_offline, model_help)
from splitfuse.outputs import RequestOutputKind

if TYPE_CHECKING:
    from splitfuse.entrypoints.llm import LLM
    from splitfuse.sampling_params import SamplingParams

PROMPT = ">>> "
STOPPED_NOTE = "(stopped)"
COMMANDS_HELP = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer."


class ChatSession:
    """One conversation with ``llm``: the history, and each answer streamed to ``out`` as it is generated.

    ``stop_requested`` is asked between engine steps (so a step is never cut in half); True stops the answer.
    """

    def __init__(self, llm: "LLM", params: "SamplingParams", out: TextIO,
                 stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.llm = llm
        self.params = params
        self.out = out
        self.stop_requested = stop_requested
        self.messages: list[dict[str, str]] = []
        self._request_ids = itertools.count()

    def reset(self) -> None:
        self.messages = []

    def ask(self, question: str) -> Optional[str]:
        """Streams the answer and keeps the exchange; None, history unchanged, if stopped.

        Raises ValueError, keeping nothing, if the conversation no longer fits the model's context."""
        messages = [*self.messages, {"role": "user", "content": question}]
        answer = self._stream(self.llm.apply_chat_template(messages))
        if answer is not None:
            self.messages = [*messages, {"role": "assistant", "content": answer}]
        return answer

    def _stream(self, prompt_token_ids: list[int]) -> Optional[str]:
        engine = self.llm.engine
        request_id = f"chat-{next(self._request_ids)}"
        # DELTA text never holds a stop string still forming or an unfinished character.
        engine.add_request(request_id, prompt_token_ids, self.params, output_kind=RequestOutputKind.DELTA)
        pieces: list[str] = []
        try:
            while not self.stop_requested():
                for output in engine.step():
                    if output.request_id != request_id:
                        continue
                    text = output.outputs[0].text
                    if text:
                        pieces.append(text)
                        self._write(text)
                    if output.finished:
                        self._write("\n")
                        return "".join(pieces)
            self._write(f"\n{STOPPED_NOTE}\n")
            return None
        finally:
            engine.abort_request(request_id)  # frees a stopped answer's blocks; a finished one is gone already

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """Inside, Ctrl-C (SIGINT) sets ``event`` instead of raising KeyboardInterrupt.

    Python runs the handler in the main thread between bytecodes, whichever thread the kernel gave the
    signal to, so the engine loop sees it after the step under way, even one spent in the compute threads."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def ask_stoppable(session: ChatSession, stop: threading.Event, question: str) -> Optional[str]:
    """``session.ask`` with Ctrl-C setting ``stop`` (the session's stop_requested) while the answer streams."""
    stop.clear()
    with ctrl_c_sets(stop):
        return session.ask(question)


def repl(session: ChatSession, stop: threading.Event) -> int:
    """Reads questions and commands until /exit, end of input or Ctrl-C at the prompt; returns 0."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # input() then has line editing and history
            import readline  # noqa: F401

        print(COMMANDS_HELP)
    try:
        while True:
            line = input(PROMPT).strip()
            if line in ("/exit", "/bye"):
                return 0
            if line in ("/reset", "/clear"):
                session.reset()
                print("(conversation cleared)")
            elif line.startswith("/"):
                print(f"unknown command {line.split()[0]}: {COMMANDS_HELP}")
            elif line:
                try:
                    ask_stoppable(session, stop, line)
                except ValueError as error:  # e.g. the conversation outgrew the context window
                    hint = " (/reset starts a new conversation)" if session.messages else ""
                    print(f"error: {error}{hint}", file=sys.stderr)
    except (EOFError, KeyboardInterrupt):  # Ctrl-D / end of input, Ctrl-C at the prompt
        print()
        return 0


def add_chat_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``splitfuse chat [QUESTION] [--model M] [sampling flags] [engine flags]``."""
    parser = subparsers.add_parser(
        "chat", help="Chat with a model in the terminal (answers streamed).",
        description="An interactive chat on the offline engine: each answer is streamed as it is generated "
                    "and the conversation is kept, rendered with the model's chat template. "
                    + COMMANDS_HELP + " A stopped answer and its question are dropped from the conversation. "
                    "With QUESTION, prints one answer and exits.")
    parser.add_argument("question", nargs="?", default=None, metavar="QUESTION",
                        help="Answer this one question and exit.")
    parser.add_argument("--model", default=None, help=model_help())
    add_sampling_flags(parser, max_tokens_default=256)
    add_engine_flags(parser)
    parser.set_defaults(func=run_chat)
    return parser


def run_chat(args: argparse.Namespace) -> int:
    from splitfuse.models.sources import DEFAULT_MODEL_NAME

    try:
        llm, params = load_offline(args, "chat")
        if not llm.has_chat_template:
            raise CommandError("chat", f"the model {args.model or DEFAULT_MODEL_NAME!r} has no chat template "
                                       f"(`splitfuse generate --raw` completes plain text)", 1)
    except CommandError as error:
        return error.report()
    stop = threading.Event()
    session = ChatSession(llm, params, sys.stdout, stop_requested=stop.is_set)
    if args.question is None:
        return repl(session, stop)
    try:
        return 0 if ask_stoppable(session, stop, args.question) is not None else 130  # 130: stopped by Ctrl-C
    except ValueError as error:
        print(f"splitfuse chat: error: {error}", file=sys.stderr)
        return 2
