import sys

from theychat.client.chat import main

sys.exit(main())
