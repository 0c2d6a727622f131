from janus_pretrain.cli import main

main()
