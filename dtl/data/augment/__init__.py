"""Batched augmentation on the device: crops, flips and normalisation (`transform`), the uint8 training chain
(`chain`), TrivialAugment/RandAugment/AugMix (`autoaugment`), random erasing (`erasing`), MixUp/CutMix
(`mix`) and the uint8 helpers they share (`uint8`)."""
