"""Faces on disk and their degradations: :mod:`.io` (the ``.bin`` format with its restricted unpickler, LFW
``pairs.txt``, image decode / PNG encode) and :mod:`.degrade` (one image under blur, low resolution or a synthetic
occlusion: the definitions every evaluation copy and ``verify --degrade`` share). Converters and copies of whole
sets are ``data_prep``'s (``python -m data_prep.bin``)."""
