"""What a run reads: CIFAR and image folders into splits (`cifar`, `folder`, `images`, `splits`), the loaders
that feed training and evaluation (`loaders`, `samplers`), cached backbone features (`features`), the
model's input normalisation (`preprocessing`) and batched augmentation (`augment`)."""
