from lib.bench.preprocess import main

main()
