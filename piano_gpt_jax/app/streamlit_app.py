"""The Streamlit entry script (`streamlit run piano_gpt_jax/app/streamlit_app.py`, or
`python -m piano_gpt_jax.app`, which also chooses the host and port)."""

import streamlit as st

from piano_gpt_jax.app import navigation

st.set_page_config(page_title="piano-gpt-jax", page_icon=":material/piano:", layout="wide")
st.navigation(list(navigation.pages().values())).run()
