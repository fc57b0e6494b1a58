"""Prints a secret it was given, then fails: its error and output must reach Job.message
with the secret masked."""
import os
import sys

print(f"token in use: {os.environ['WANDB_API_KEY']}", file=sys.stderr)
raise ValueError("batch 7 has no labels")
