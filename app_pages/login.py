"""Sign in (anonymous visitors)."""

import streamlit as st

from portal import auth, widgets

widgets.header("Sign in", ":material/login:")
user = auth.current_user()
if user is not None and not st.session_state.get("just_signed_in"):
    st.switch_page(auth.home(user))

user = auth.login_form()
if user is not None:
    # No st.rerun() or switch_page in this run: it would stop the sign-in cookie from being set.
    st.session_state["just_signed_in"] = True
    st.success(f"Welcome, {user.name}.", icon=":material/check_circle:")
    if st.button("Continue", type="primary", key="continue"):
        del st.session_state["just_signed_in"]
        st.switch_page(auth.home(user))
else:
    st.caption("No account yet?")
    st.page_link("app_pages/register.py", label="Register", icon=":material/person_add:")
