"""The exception tree of Scaler Wizard. Errors are raised by library code and handled only at
the CLI boundary, which maps each family to an exit code and a one-paragraph message.

    ScalerWizardError                 exit 1   anything we raise on purpose
    ├── InputError                    exit 2   the user's input is wrong; the message says what to change
    │   ├── RecipeError                        recipe file unreadable or invalid (all problems at once)
    │   ├── ModelLoadError                     model folder missing / malformed / unsupported
    │   ├── DataError                          data files missing / malformed / empty
    │   ├── PlanError                          the requested plan cannot work (does not fit, bad target)
    │   │   └── ProbeMemoryError               (evaluation/probes.py) a probe does not fit at its length
    │   ├── UnsupportedMethodError             context method not available for this model
    │   ├── TelemetryReadError                 (telemetry/reader.py) unreadable telemetry file
    │   ├── TelemetrySchemaError               (telemetry/schemas.py) a record violates its JSON Schema
    │   ├── SnapshotNotFoundError              (cache/checkpoints.py) no snapshot matches the request
    │   └── RunNotFoundError                   (cockpit/rundir.py) no such run directory
    ├── CheckpointError                        (cache/checkpoints.py) snapshot store failures
    │   ├── SnapshotCommitError                a commit failed cleanly (e.g. disk full); older snapshots intact
    │   └── SnapshotCorruptError               a snapshot does not verify
    ├── StateFormatError                       (cache/state.py) stored training state unreadable
    ├── ExportError                            the saved model does not reproduce the trained one (not published)
    ├── PluginError                   exit 2   a registered plugin is malformed or failed to load
    ├── ContractError                 exit 3   no valid human contract / approval for this run, or scope exceeded
    └── RunHalted                     exit 4   the safety envelope or the operator stopped the run
    (exit 5, EXIT_GATES_FAILED: not an error -- the run completed but failed its gates)

Families defined next to the module that raises them are listed here so the tree stays one picture.
"""

from __future__ import annotations


class ScalerWizardError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class InputError(ScalerWizardError):
    exit_code = 2


class RecipeError(InputError):
    """Carries every problem found, each as (field path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = "; ".join(f"{path}: {msg}" for path, msg in problems)
        super().__init__(
            f"Recipe {source} has {len(problems)} problem(s): {lines}.",
            hint="Fix the fields named above (see `scaler-wizard validate --help` and docs/recipe.md).",
        )


class ModelLoadError(InputError):
    pass


class DataError(InputError):
    pass


class PlanError(InputError):
    pass


class UnsupportedMethodError(InputError):
    pass


class PluginError(ScalerWizardError):
    exit_code = 2


class ContractError(ScalerWizardError):
    exit_code = 3


class RunHalted(ScalerWizardError):
    exit_code = 4


class ExportError(ScalerWizardError):
    """The saved model, reloaded with plain transformers, does not compute what was trained and
    probed: it is not published (the run fails rather than ship a different model)."""


# A run that completed but did not pass every gate (status.json: completed_gates_failed,
# summary.json: verdict gates_failed): not an error, yet never exit 0.
EXIT_GATES_FAILED = 5
