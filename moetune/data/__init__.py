"""Training data: the one file reader (`read`), sources as Arrow and the recipe's list of them
(`sources`), the format registry (`formats`: a row -> messages), templates and trained-token labels
(`rows`: messages -> tokens), the cached tokenising pipeline and data.mix (`pipeline`), packing
(`packing`), the default data set (`datagen`).

Importing `moetune.data.datagen` stays torch-free (`moetune data make`); nothing is imported here."""
