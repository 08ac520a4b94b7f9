"""Constellation portal entry point (placeholder until the portal issue lands)."""

import logging

import streamlit as st

from engine import Settings, Store

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@st.cache_resource
def _store() -> Store:
    return Store(Settings.from_env())


st.set_page_config(page_title="Constellation", page_icon="✨")
st.title("✨ Constellation")
st.write("Run `main(row)` over every row of a dataset, on volunteers' machines.")
st.info("Submit projects with `python -m engine submit SCRIPT DATASET --wait` for now.")
