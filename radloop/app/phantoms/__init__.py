"""Generated test and demo data without patient data: CT series (`ct`) and abdominal phantoms
with their ground truth (`abdomen`)."""
