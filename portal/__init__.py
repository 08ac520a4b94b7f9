"""Streamlit-side helpers of the portal: shared state, sign-in, widgets and error display.

Pages import these; the engine never does.
"""
