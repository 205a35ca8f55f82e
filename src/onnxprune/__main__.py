import sys

from onnxprune.cli import main

sys.exit(main())
