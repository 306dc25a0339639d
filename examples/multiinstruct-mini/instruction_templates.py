# A small MultiInstruct-shaped checkout for the instraug demo: the same structure as upstream's
# instruction_templates.py (constants, then one branch per task assigning `instructs`).
# instraug reads this file as a syntax tree; it never imports or runs it.
import random


def build_instruction(task, text=None, options=None, region=None, context=None, question=None,
                      explanation=None, response=None, premise=None, hypothesis=None, answer=None,
                      meta_data=None, target=None, use_natural=False, instruction_id=-1):
    options_token = "\n\n[Options]:"
    split_token = "||||"
    region_split_token = "||||"
    image_token = "image"
    region_token = "Regions: "

    if task == 'image_caption':
        instructs = [
            f"""In this task, you will look at the image and write a short caption for it.""",
            f"""Write a one-sentence description of what the image shows.""",
            f"""Describe the main content of the {image_token} in a single sentence.""",
            f"""Look at the image carefully and tell me what is happening in it.""",
            f"""Generate a brief caption that summarizes the image.""",
        ]
    elif task == 'VQA_color':
        instructs = [
            f"""{question}{options_token} {split_token.join(options)}""",
            f"""Answer the question about the color of an object in the image. {question}"""
            f"""{options_token} {split_token.join(options)}""",
            f"""In this task, you need to identify the color of something in the image. """
            f"""Question: {question}{options_token} {split_token.join(options)}""",
            f"""Look at the image and pick the color that answers "{question}"."""
            f"""{options_token} {split_token.join(options)}""",
            f"""Choose the correct color from the options to answer the question. {question}"""
            f"""{options_token} {split_token.join(options)}""",
        ]
    elif task == 'GC':
        instructs = [
            f"""Write a short description of the part of the image given by {region_split_token.join(region)}.""",
            f"""What is shown in the region {region_split_token.join(region)} of the image?""",
            f"""Describe the content of {region_split_token.join(region)} in the image.""",
            f"""Generate a caption for the region {region_split_token.join(region)}.""",
            f"""{region_split_token.join(region)} marks a region of the image. Locate it and describe what it contains.""",
        ]
    elif task == 'wikihow_next_step':
        if len(context) == 0:
            context = '"nothing"'
        else:
            context = '\n'.join(context)
        instructs = [
            f"""For the task {meta_data['method']}, given the steps done so far {context} and the current step in the image, what is the next step?""",
            f"""You are doing "{meta_data['method']}". The previous steps were {context}. The image shows the current step. Write the next step.""",
            f"""Given the goal {meta_data['method']} and the history {context}, predict the step that follows the one in the image.""",
            f"""What should be done after the step shown in the image? The task is {meta_data['method']} and the earlier steps are {context}.""",
            f"""Task: {meta_data['method']}. History: {context}. Based on the image of the current step, describe the next step.""",
        ]
    elif task == 'region_generation':
        instructs = [
            f"""Find every region of the image that contains "{text}".""",
            f"""Which parts of the image show {text}? Answer with their regions.""",
            f"""Locate {text} in the image and give the bounding box of each one.""",
        ]
    elif task == 'select_overlap_most_region':
        given_region = region_split_token.join(meta_data['object_regions']['given_region'])
        instructs = [
            f"""Which of the regions in the options overlaps the most with {given_region}?{options_token} {split_token.join(options)}""",
            f"""Given the region {given_region}, choose the option that covers the largest part of it.{options_token} {split_token.join(options)}""",
            f"""Compare each option with the region {given_region} and select the one sharing the most area with it.{options_token} {split_token.join(options)}""",
        ]
    elif task == 'if_region_overlap':
        given_region = region_split_token.join(meta_data['object_regions']['given_region'])
        instructs = [
            f"""Is there any overlap between {region[0]} and {given_region}?{options_token} {split_token.join(options)}""",
            f"""Tell whether the region {given_region} and the region {region[0]} share some area.{options_token} {split_token.join(options)}""",
            f"""Look at the two regions {region[0]} and {given_region}. Do they overlap?{options_token} {split_token.join(options)}""",
        ]
    elif task == 'visual_nli':
        instructs = [
            f"""Decide whether the image supports the sentence "{text}".{options_token} {split_token.join(options)}""",
            f"""Can the content of the image support the claim: {text}?{options_token} {split_token.join(options)}""",
            f"""Read the text "{text}" and tell whether the image entails it.{options_token} {split_token.join(options)}""",
            f"""Does the image agree with the statement "{text}"?{options_token} {split_token.join(options)}""",
            f"""In this task, you judge if the sentence "{text}" is true of the image.{options_token} {split_token.join(options)}""",
        ]
    else:
        raise ValueError(f"unknown task {task}")

    return random.choice(instructs)
