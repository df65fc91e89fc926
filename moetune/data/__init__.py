"""Training data: rows, formats and templates (`rows`), sources read into Arrow (`sources`), the cached
tokenising pipeline and data.mix (`pipeline`), packing (`packing`), the default data set (`datagen`).

Importing `moetune.data.datagen` stays torch-free (`moetune data make`); nothing is imported here."""
