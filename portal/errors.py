"""The one translator from errors to what a person reads.

Pages run engine calls inside ``shown()``: an engine error becomes an ``st.error`` in
plain words and the page stops there. Anything else is a bug of the portal: ``internal``
logs it with its traceback and shows the visitor only a short message with a reference
to find it in the log (the entry point and every live fragment run inside ``guarded``).
A research script's own errors are data, shown as text through ``readable``.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
from contextlib import contextmanager
from typing import Callable, Iterator

import streamlit as st

from engine.errors import (ClusterUnavailable, ConstellationError, Forbidden, InvalidDataset,
                           InvalidRequest, InvalidScript, NotFound)
from engine.node.result import plain_text

logger = logging.getLogger(__name__)

_LEADS = (
    (InvalidScript, "The script cannot be used"),
    (InvalidDataset, "The dataset cannot be used"),
    (NotFound, "Not found"),
    (Forbidden, "Not allowed"),
    (ClusterUnavailable, "The cluster is unavailable right now; try again in a minute"),
    (InvalidRequest, "That did not work"),
)

# Links, images, emphasis, code, HTML, LaTeX and Streamlit's :color[...] directives.
_MARKDOWN = re.compile(r"([\\`*_{}\[\]<>#!|~$])")
# "SomeError: message" on a line of its own: how Python names an exception in a traceback.
_EXCEPTION_LINE = re.compile(r"^\s*((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|"
                             r"Interrupt|Warning|Failure)): (.+)$")


def plain(text: str) -> str:
    """``text`` with Markdown syntax escaped, for user content inside Markdown elements."""
    return _MARKDOWN.sub(r"\\\1", str(text))


def readable(text: str | None) -> str | None:
    """An error as a person should read it: without terminal colour codes, and naming the
    root cause first. Ray wraps a failure in its own exceptions ("RayTaskError(...)",
    "RaySystemError: System error: ..."); the exception that started it is the last one
    its text names, and that is what the first line says."""
    if text is None:
        return None
    text = plain_text(text).strip()
    first = text.splitlines()[0] if text else ""
    if not first.startswith(("Ray", "ray::", "System error")):
        return text
    causes = [m for m in map(_EXCEPTION_LINE.match, text.splitlines()) if m]
    causes = [m for m in causes if not m.group(1).startswith("Ray")]
    if not causes:
        return text
    root = f"{causes[-1].group(1)}: {causes[-1].group(2).strip()}"
    return root if root == text else f"{root}\n\n(reported by Ray as: {first})"


def sentence(exc: ConstellationError) -> str:
    """An engine error's own message as a sentence: "Wrong user name or password."."""
    text = str(exc).strip()
    text = text[:1].upper() + text[1:]
    return plain(text if text.endswith((".", "!", "?")) else text + ".")


def message(exc: ConstellationError) -> str:
    lead = next((lead for kind, lead in _LEADS if isinstance(exc, kind)), "Something went wrong")
    return f"{lead}: {exc}"


def show(exc: ConstellationError) -> None:
    """Show an engine error without stopping the page."""
    logger.info("portal: %s: %s", type(exc).__name__, exc)
    st.error(plain(message(exc)), icon=":material/error:")


@contextmanager
def shown(stop: bool = True) -> Iterator[None]:
    """Show an engine error raised inside the block; then stop the page unless ``stop`` is False."""
    try:
        yield
    except ConstellationError as exc:
        show(exc)
        if stop:
            st.stop()


def internal(exc: BaseException) -> None:
    """A bug of the portal: the log gets the traceback, the visitor a reference to it."""
    reference = secrets.token_hex(4)
    logger.error("portal: internal error %s: %s: %s", reference, type(exc).__name__, exc,
                 exc_info=exc)
    st.error(f"Something went wrong in the portal (reference {reference}). It has been logged "
             f"for the operator; try again in a moment.", icon=":material/error:")


@contextmanager
def contained() -> Iterator[None]:
    """Show an unexpected error inside the block as ``internal`` does, without a traceback.
    (Streamlit's st.stop, st.rerun and st.switch_page are not Exceptions; they pass.)"""
    try:
        yield
    except ConstellationError as exc:
        show(exc)
    except Exception as exc:  # noqa: BLE001 - the translator of last resort
        internal(exc)


def guarded(function: Callable) -> Callable:
    """``function`` run inside ``contained()``: for live fragments, which refresh on their
    own, outside the entry point's guard."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with contained():
            return function(*args, **kwargs)
    return run
