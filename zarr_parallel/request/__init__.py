"""The validated request: its model, its plain form, and the checks on what a request may ask."""
