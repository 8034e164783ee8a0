from onnx_obs.cli import main

main()
