"""Page scripts that st.navigation runs (never imported as modules); this file only makes
setuptools ship them with the package."""
