"""Initial predictors: per-window dense CLIP features of the field's training-free methods."""
