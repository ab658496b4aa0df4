import sys

from client.chat import main

sys.exit(main())
