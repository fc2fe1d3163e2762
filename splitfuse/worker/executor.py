"""Executors: what the EngineCore hands each ``SchedulerOutput`` to — a model runner here, a fake one in tests."""

from __future__ import annotations

from typing import Protocol

from splitfuse.step import ModelRunnerOutput, SchedulerOutput


class Executor(Protocol):
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def shutdown(self) -> None: ...


class UniProcExecutor:
    """One ModelRunner in this process (the CPU engine: torch's threads do the parallel work)."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def shutdown(self) -> None:
        pass
