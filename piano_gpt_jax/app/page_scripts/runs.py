"""Page script run by st.navigation (a file, so AppTest.switch_page can open it too)."""

from piano_gpt_jax.app import runs_page

runs_page.render()
