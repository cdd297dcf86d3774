from moge_ds.upcycle import main

main()
