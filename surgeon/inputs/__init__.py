"""Everything read or generated as input: images, text pools, templates, data sets and readers, the toy world."""
