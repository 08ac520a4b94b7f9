"""Register a researcher and/or volunteer account (admins are made with the CLI); the
new account is signed in at once and lands on its page."""

import streamlit as st

from engine import accounts
from engine.accounts import Role
from portal import auth, errors, state, widgets

user = auth.current_user()
if user is not None:
    st.switch_page(auth.home(user))
widgets.header("Register", ":material/person_add:",
               "Researchers run projects; volunteers lend their machines. You can be both.")

ROLE_CHOICES = {"Researcher": {Role.RESEARCHER}, "Volunteer": {Role.VOLUNTEER},
                "Both": {Role.RESEARCHER, Role.VOLUNTEER}}

with st.form("register", enter_to_submit=False):
    name = st.text_input("User name", key="reg_name", max_chars=64,
                         help="Letters, digits, '-' or '_'. You sign in with it.")
    email = st.text_input("Email", key="reg_email")
    password = st.text_input("Password", type="password", key="reg_password",
                             help=f"At least {accounts.MIN_PASSWORD_CHARS} characters.")
    repeat = st.text_input("Repeat password", type="password", key="reg_repeat")
    role = st.radio("I am a", list(ROLE_CHOICES), horizontal=True, key="reg_role")
    submitted = st.form_submit_button("Register", type="primary")

if submitted:
    if password != repeat:
        st.error("The two passwords differ.", icon=":material/error:")
    else:
        with errors.shown():
            user = accounts.register_user(state.store(), name, email, password,
                                          ROLE_CHOICES[role], address=auth.client_address())
        st.success(f"Account {user.name} created.", icon=":material/check_circle:")
        auth.signed_in(user)
