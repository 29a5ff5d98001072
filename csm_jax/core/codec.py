"""Mimi's fixed audio format, which CSM's frames follow: the one home of these numbers."""

SAMPLE_RATE = 24_000  # Hz, mono
FRAME_SAMPLES = 1920  # samples per Mimi frame
FRAME_MS = 1000 * FRAME_SAMPLES // SAMPLE_RATE  # 80 ms per frame, 12.5 frames per second
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
CODEBOOK_SIZE = 2048  # codes per codebook; CSM's audio ids 2048..2050 exist in its vocabulary but decode to nothing


def frames_for_samples(samples: int) -> int:
    """The number of frames Mimi makes of `samples` samples (it pads the last partial frame)."""
    return -(-int(samples) // FRAME_SAMPLES)
