"""Reading and writing the small TOML files fracpass uses (plans, stage plans, target profiles)."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Dict, List, Type, Union


def read_toml(path: Union[str, Path], what: str, error: Type[Exception]) -> Dict[str, Any]:
    """Parse ``path``; unreadable, non-UTF-8 or invalid files raise ``error`` naming the file (``what``
    says what it should have been, e.g. "plan file")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start}; TOML files are "
                    f"UTF-8, so save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML: {e}") from e


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def toml_table(header: str, entries: Dict[str, Any]) -> List[str]:
    """The lines of one table (``[name]``, or ``[[name]]`` for an array entry) and a blank line."""
    return [header] + [f"{key} = {toml_value(value)}" for key, value in entries.items()] + [""]
