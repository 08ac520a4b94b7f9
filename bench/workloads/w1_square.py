def main(row):
    return row["x"] ** 2
