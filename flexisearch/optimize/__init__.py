"""The search: configs, schedule spaces, the trial evaluation, the Optuna and Ray backends, export."""
