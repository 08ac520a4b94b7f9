"""Process-wide objects shared by every session: the settings and the store."""

from __future__ import annotations

import streamlit as st

from engine import Settings, Store


def settings() -> Settings:
    """Settings from the environment (cheap; read on every run so tests can change them)."""
    return Settings.from_env()


@st.cache_resource(show_spinner=False)
def _store(database_url: str, data_dir: str) -> Store:
    return Store(Settings.from_env().replace(db_url=database_url, data_dir=data_dir))


def store() -> Store:
    """One Store (one connection pool) per database for the whole portal process."""
    current = settings()
    return _store(current.database_url, current.data_dir)
