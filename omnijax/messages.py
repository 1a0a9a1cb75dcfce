"""How error messages show the values they refuse: every value quoted is cut short, so a huge
input (a megabyte string, a list an alias bomb expands exponentially) still gives one short line.
Imported by everything that words an error, so it sits on the ground floor."""

from __future__ import annotations

import reprlib
from typing import Any

# Error messages quote the values they refuse, and a value may be huge (a megabyte string, a list
# an alias bomb expands exponentially): each is shown cut to this many characters, ending "…".
QUOTE_LIMIT = 200
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 3, QUOTE_LIMIT, QUOTE_LIMIT, 40
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = _QUOTE.maxarray = 8
_QUOTE.fillvalue = "…"


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
  """`text` cut to `limit` characters, ending "…" when it was longer."""
  return text if len(text) <= limit else text[:limit - 1] + "…"


def quoted(value: Any) -> str:
  """repr(value) for an error message: nested containers shortened element by element (so an
  exponentially aliased list is never walked), at most QUOTE_LIMIT characters."""
  return clip(_QUOTE.repr(value))
