"""Training presets: `python -m train --config train/configs/NAME.py`, each a `get_config()`."""
