"""Sign in (anonymous visitors): what Constellation is, and the sign-in form."""

import streamlit as st

from portal import auth, widgets

user = auth.current_user()
if user is not None:
    # Signed in (the run after signing in, which the sign-in cookie's component starts).
    st.switch_page(auth.home(user))
widgets.header("Constellation", ":material/hub:", "Volunteer computing for research scripts.")
widgets.about()
auth.sign_in_form()
st.caption("No account yet?")
st.page_link("app_pages/register.py", label="Register", icon=":material/person_add:")
