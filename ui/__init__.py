"""Gradio UI for the prediction API: upload a pet photo, see its breed."""

import os

# Gradio reads this when it is imported and would otherwise try to phone home; there is no network
# in CI or on the serving machines, and users did not opt in. Set here so it precedes every import.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
