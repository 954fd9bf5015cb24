"""python -m qimg"""

from qimg.cli import main

main()
