"""The project's own error types: every refusal of bad input is one of these, and its message names the file.

They subclass the built-in types earlier code raised (ValueError, FileNotFoundError, RuntimeError), so
`except ValueError` and `pytest.raises(ValueError)` keep working; `except MaeError` catches them all.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path


class MaeError(Exception):
    """Base of every error this project raises on purpose (bad input, refused file, failed write)."""


class InputError(MaeError, ValueError):
    """A file or value given to the project is unusable; the message names it and the fix."""


class ConfigError(InputError):
    """A bad configuration key or value, named in the message."""


class CheckpointError(InputError):
    """A checkpoint folder or weights file that cannot be read as one (truncated, wrong type, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that could run code (or is not what its name says) was refused before use."""


class DataFileError(InputError):
    """A list, caption list, tokenizer or video file that cannot be used; the message names file (and line)."""


class MissingFileError(MaeError, FileNotFoundError):
    """A file or folder the run needs is not there (or is not a regular file / folder)."""


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2
MAX_REPR = 120  # characters of a value an error message shows


def short_repr(value: object) -> str:
    """repr() bounded in length and depth: an error message never formats a huge (or alias-bombed) value."""
    text = _SHORT.repr(value)  # reprlib never formats the parts it leaves out
    return text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "..."


def read_json_object(path: str | Path, what: str) -> dict:
    """The JSON object in the file `what` names; ConfigError naming the file if it is not readable JSON or no object."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(64 * 1024 * 1024).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"{what} {path} is not a JSON file this can read ({short_repr(str(exc))}); give a "
                          "UTF-8 JSON object") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} holds a JSON {type(data).__name__}, not an object ({{...}})")
    return data
