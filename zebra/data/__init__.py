"""Training / eval data readers (e.g. `zebra.data.sharegpt.iter_sharegpt`). Import the submodules directly."""
