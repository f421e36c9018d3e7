import gc
import sys

from ncd.cli import main

rc = main()
# The process ends here. Without this, the interpreter's shutdown garbage-collects the whole heap of
# imported modules (torch alone brings hundreds of thousands of objects): 0.3-0.4 s of every job on a
# 2-core machine, a sixth of an evaluate job. The frozen objects are skipped by that collection; files,
# logs and atexit handlers are finished as before.
gc.freeze()
sys.exit(rc)
