"""The library the stage commands share: paths, params, data sources, images, models, training, plots."""
