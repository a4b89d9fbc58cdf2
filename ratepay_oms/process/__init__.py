"""Process definitions: YAML files → immutable, validated definitions (no database, no RatePAY).

The public names live here so the engine and the console import from one place:
``load_process``, ``load_processes``, ``check_files``, ``default_process_dir`` and the error
types; drawings are in ``ratepay_oms.process.draw``.
"""

from ratepay_oms.process.errors import (
    ProcessDefinitionError,
    ProcessProblem,
    RenderError,
    UnknownProcessError,
)
from ratepay_oms.process.loader import (
    check_files,
    default_process_dir,
    load_named_process,
    load_process,
    load_processes,
    parse_timeout,
)
from ratepay_oms.process.model import (
    EventDef,
    ProcessDefinition,
    SourceLocation,
    StateDef,
    TransitionDef,
)

__all__ = [
    "EventDef",
    "ProcessDefinition",
    "ProcessDefinitionError",
    "ProcessProblem",
    "RenderError",
    "SourceLocation",
    "StateDef",
    "TransitionDef",
    "UnknownProcessError",
    "check_files",
    "default_process_dir",
    "load_named_process",
    "load_process",
    "load_processes",
    "parse_timeout",
]
