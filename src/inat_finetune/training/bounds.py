"""Upper bounds of the numeric options of ``TrainConfig`` (``training/config.py``).

Each is far above any sensible value and below where the value breaks something: numpy seeds
are 32-bit, torch keeps lr and weight decay as float32 scalars (3.4e38), datetime.timedelta
ends at 1e9 days, and an image side beyond a few thousand pixels does not fit a batch in memory.
"""

MAX_SEED = 2**32 - 1


MAX_EPOCHS = 1_000_000


MAX_BATCH = 1_000_000


MAX_STEPS = 10**12


MAX_LR = 100.0


MAX_LR_SCALE = 1000.0


MAX_WEIGHT_DECAY = 100.0


MAX_MIX_ALPHA = 1000.0


MAX_IMG_SIZE = 4096


MAX_WORKERS = 1024


MAX_NODES = 100_000


MAX_MINUTES = 1e6  # about two years


MAX_FLOAT32 = 3.4e38
