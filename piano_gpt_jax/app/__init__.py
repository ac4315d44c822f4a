"""The web app (`python -m piano_gpt_jax.app`): generate, review datasets and compare runs.

Musicians judge a piano model by looking and listening, so the pages show piano rolls and play
audio rather than print numbers. UI code lives in the `*_page` modules; everything they compute
(prompts, sampling, audio, run logs) lives in plain modules that tests call without Streamlit.
"""
