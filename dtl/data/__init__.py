"""What a run reads and how it is fed: the data sets (`datasets`: which one a run reads; `cifar`; image folders:
`folder`, their splits `folder_split` and saved split `split_file`, the files `images`; `splits`: the split objects
and the seeding, subsetting and stratified sampling rules), the decoded-image cache (`image_cache`), the loaders
that feed training and evaluation (`loaders/`, with `samplers`), cached backbone features (`features`), the
model's input normalisation and the one eval resize (`preprocessing`, `constants`) and batched augmentation
(`augment/`)."""
