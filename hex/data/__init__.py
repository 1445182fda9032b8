"""HEX training data: split files and the leakage check (:mod:`.splits`), label tables joined with the patch store
(:mod:`.datasets`), batch transforms on the training device (:mod:`.transforms`)."""
