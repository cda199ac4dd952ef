"""Synthetic "shapes" world for the tiny model family.

dataset.py renders captioned images of coloured shapes (plus ControlNet edge maps,
masks and two recognisable LoRA styles); judge.py is a small CNN that reads such
images back into attributes so that generated images can be scored against their
prompts. Only numpy + pillow are needed for the dataset; torch for the judge.
"""
