"""The one translator from engine errors to what a person reads.

Pages run engine calls inside ``shown()``: an engine error becomes an ``st.error`` in
plain words and the page stops there. Anything else is a bug and propagates, so that
Streamlit shows it and the log records it.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Iterator

import streamlit as st

from engine.errors import (ClusterUnavailable, ConstellationError, Forbidden, InvalidDataset,
                           InvalidRequest, InvalidScript, NotFound)

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


def plain(text: str) -> str:
    """``text`` with Markdown syntax escaped, for user content inside Markdown elements."""
    return _MARKDOWN.sub(r"\\\1", str(text))


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
