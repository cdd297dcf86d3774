from moge_ds.analysis.report import main

main()
