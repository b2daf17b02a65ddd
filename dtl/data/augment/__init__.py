"""Batched augmentation on the device: the fused crops, flips, eval resize and normalisation (`transform`), built
on the crop boxes and flips (`boxes`), the exact separable resampling (`resample`) and its native CPU path
(`native`); the uint8 training chain (`chain`), TrivialAugment/RandAugment/AugMix (`autoaugment`), random erasing
(`erasing`), MixUp/CutMix (`mix`) and the uint8 helpers they share (`uint8`)."""
