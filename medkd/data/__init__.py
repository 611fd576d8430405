"""A data set's files as batches (decoded images, tokens, loaders), and fetching the raw data sets."""
